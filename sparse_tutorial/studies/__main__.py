"""``python -m sparse_tutorial.studies quality ...``: the long studies behind the chapters (see :mod:`.gap`)."""
from .gap import main

if __name__ == "__main__":
    main()
