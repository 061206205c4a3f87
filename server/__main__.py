"""``python -m server``: run the tqindex REST service."""

import sys

from server.main import main

sys.exit(main())
