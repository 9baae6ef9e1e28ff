"""`python -m cryowae ...` (also what `torchrun -m cryowae train ...` runs)."""

from cryowae.cli.main import main

if __name__ == "__main__":
    main()
