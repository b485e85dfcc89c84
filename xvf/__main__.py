import sys

from xvf.app.cli import main

sys.exit(main())
