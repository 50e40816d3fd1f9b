"""MiM Studio: MiM's Segment, Mask-in-mask preview and Fine-tune in a web browser.

A trame-slicer server (Slicer's MRML core and views, rendered on the server and streamed
to the page) over the same Qt-free logic as the Slicer module, ``MiMSlicerLib``; jobs
run as ``python -m mimcore ...`` child processes. Start: ``make studio`` or
``python -m MiMStudio`` (from ``MiMSlicer/``); see ``MiMStudio/README.md``.

| module | what it holds |
|---|---|
| ``config`` | settings, command line, the access-token rule |
| ``access`` | token check and one page per server; paths confined to shared folders |
| ``catalog`` | the sample CTs, data-folder volumes and pre-training runs a page may open |
| ``uploads`` | size-limited uploads into a private temporary folder |
| ``cases`` | the list of fine-tuning cases (volume, segmentation pairs) |
| ``views`` | view layouts (segment, preview), click position, server-side snapshots |
| ``app`` | the server: state, actions, task polling |
| ``ui`` | the page |
| ``__main__`` | ``python -m MiMStudio`` |
"""
