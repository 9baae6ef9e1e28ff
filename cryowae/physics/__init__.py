"""Physics of tomography: missing-wedge masks, rotations, projection, CTF, simulation."""
