"""twistd plugin ``happyrobot-ws``; the code lives in happyrobot.tap, imported only when used."""

from twisted.application.service import ServiceMaker

happyrobotWS = ServiceMaker(
    "Happy Robot real-time server",
    "happyrobot.tap",
    "Project rooms over WebSocket, with /health, /stats and /broadcast",
    "happyrobot-ws",
)
