"""
Seams: the only modules that use what a library does not make public.

happyrobot relies on a few private or undocumented attributes of the
libraries it is built on (the state of Autobahn's frame machine, a Twisted
HTTP channel's requests, txredisapi's parser).  Each library's are used in
one small module, which also checks at start-up that every one of them is
still there, so that an upgrade that removes one stops the server with one
clear line naming the library and its version, instead of failing later in
the middle of a connection:

  - L{happyrobot.seams.autobahn}: Autobahn's WebSocket protocol and factory;
  - L{happyrobot.seams.twisted}: Twisted;
  - L{happyrobot.redis.client}: txredisapi (its only importer).

Each check raises L{Unsupported}; makeService turns it into the same
one-line exit as a bad setting.
"""


class Unsupported(Exception):
    """The installed version of a library lacks something happyrobot relies on (one line)."""
