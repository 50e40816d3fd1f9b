"""mimcore: MiM (Mask in Mask) hierarchical masked pre-training for 3D CT.

Volumes are handled as arrays plus geometry (a 4x4 RAS affine); nothing here knows
about 3D Slicer.
"""

__version__ = "0.1.0"
