"""``python -m refnorm.lessons --student DIR``: :func:`refnorm.lessons.student.main`."""

import sys

from refnorm.lessons.student import main

if __name__ == "__main__":
    sys.exit(main())
