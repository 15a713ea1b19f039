"""`python -m tlray.cli ...` is `tlray ...`."""

from tlray.cli.exit import exit_now
from tlray.cli.main import main

exit_now(main())
