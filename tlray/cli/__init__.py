"""Every command-line parser: `tlray ...` and the job scripts' shared flags."""

import time

# When the command started (as near as Python lets tlray see it): a sweep's `tune.budget`
# counts the user's whole wait, imports and the preflight included.
STARTED_AT = time.time()
