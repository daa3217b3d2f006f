"""`python -m meshserve ...` is the `meshserve` command."""
import sys

from meshserve.commands.main import main

if __name__ == "__main__":
    sys.exit(main())
