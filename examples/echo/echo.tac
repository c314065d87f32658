# twistd -n --pidfile echo.pid -y examples/echo/echo.tac
# The echo server of examples/echo/echo.py; kill -HUP $(cat echo.pid) upgrades it.
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from echo import make_application  # noqa: E402

application = make_application()
