"""tlray: distributed transfer learning with timm, Ray Train/Tune/Data and MLflow."""

import os as _os

from tlray.session import PROGRESS_LINES as _PROGRESS_LINES

# Ray reads this once, when it is first imported (a user's own value wins).
_os.environ.setdefault("RAY_DEDUP_LOGS_ALLOW_REGEX", _PROGRESS_LINES)

__version__ = "0.1.0"
