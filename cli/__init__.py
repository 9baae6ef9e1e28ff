"""The `cryowae` command line (installed as `cryowae.cli`): parse, call the library, print."""
