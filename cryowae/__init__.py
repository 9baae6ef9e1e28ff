"""cryowae: restore cryo-electron tomograms with 3D Wasserstein-autoencoder restorers.

Arrays are ZYX, voxel sizes in Angstrom, angles in degrees; the tilt axis is Y unless
said otherwise.
"""

__version__ = "0.1.0"
