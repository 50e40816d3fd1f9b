"""MiMSlicerLib: everything the MiMSlicer module does except the Qt wiring.

It imports ``slicer`` (MRML nodes, module logic classes) but never ``qt`` or
``slicer.app``, so it runs, and is tested, with the ``slicer-core`` package outside the
Slicer application. It never imports torch either: all heavy work runs in a child
process (``python -m mimcore ... --progress json``).

Modules, one concept each:

=====================  =================================================================
``errors``             :class:`MiMSlicerError`, the one exception users see
``volumes``            volume node <-> file (MRML storage node), IJK-to-RAS, transforms
``segmentations``      segmentation node <-> label map file, segment names <-> labels
``jobs``               :class:`Job`: one ``mimcore`` child process, its events, cancel
``library``            the local model library and registries, read without torch
``preview``            ``mim reconstruct`` outputs -> volume nodes in subject-hierarchy folders
``tasks``              :class:`Task`: a user-level operation (jobs + building the result)
``views``              the preview's centre (point / crosshair / volume centre), layout, restoring views
``plots``              the fine-tuning curves (table, chart, series), made once the job has started
``modelinfo``          a model's details (labels, spacing, size, provenance, licence), first-run text
``fields``             the GUI fields' small decisions (unset paths, "Fast (CPU)", restart after install)
``logic``              :class:`MiMLogicCore`: what the GUI calls
``dependencies``       installing torch / MONAI inside Slicer
=====================  =================================================================

Nothing is imported here, so that ``from MiMSlicerLib import dependencies`` stays cheap.
"""
