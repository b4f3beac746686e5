"""`python -m anchorcredit.cli ...` = `anchorcredit ...`."""

import sys

from anchorcredit.cli import main

sys.exit(main())
