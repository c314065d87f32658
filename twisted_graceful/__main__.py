import sys

from twisted_graceful.cli import main

sys.exit(main())
