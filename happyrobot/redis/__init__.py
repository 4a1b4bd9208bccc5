"""
The Redis engine of the bus, used when ``REDIS_URL`` is set: every instance
of a deployment publishes its rooms' events to Redis and delivers, from its
subscriptions, the events of the rooms it has local members in.

Small parts, each with one job:

  - L{keys}: Redis key and channel names and the message formats (pure);
  - L{scripts}: the Lua scripts, package data loaded once;
  - L{client}: the connections, and the only importer of txredisapi;
  - L{sequencer}: each room's delivery order, a pure state machine;
  - L{presence}: members across instances, heartbeats, statistics;
  - L{bus}: L{RedisBus}, the facade the rest of the server sees.
"""
