"""`python -m consumer` is the `offline-conversions` command."""

import sys

from consumer.cli import main

sys.exit(main())
