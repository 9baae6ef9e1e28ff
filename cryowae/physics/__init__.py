"""The forward model of tomography: tilt geometry (`geometry`), missing-wedge masks
(`wedge`), Fourier-space helpers (`fourier`), rotations (`rotation`) and the CTF (`ctf`).
The simulator built on it lives in `cryowae.simulation`."""
