"""`python -m vmm`: the same as the `vmm` command."""

from vmm.cli import main

if __name__ == "__main__":
    main()
