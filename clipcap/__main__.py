"""``python -m clipcap``: the same as the ``clipcap`` command."""

from clipcap.commands import main

if __name__ == "__main__":
    main()
