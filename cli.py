"""Runs the `digitjax` command from a checkout, without installing it: `python cli.py train`."""

from digitjax.launch import main

if __name__ == "__main__":
    main()
