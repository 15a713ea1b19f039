"""`python -m tlray.cli ...` is `tlray ...`."""

import sys

from tlray.cli.main import main

sys.exit(main())
