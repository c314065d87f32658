from twisted.application.service import ServiceMaker

graceful = ServiceMaker(
    "twisted-graceful",
    "twisted_graceful.tap",
    "HTTP server that upgrades itself on SIGHUP without dropping a connection",
    "graceful",
)
