"""Adapter file formats besides diffadapt's own and PEFT's (``diffadapt.checkpoint``).

* :mod:`diffadapt.formats.lycoris` -- LyCORIS / kohya / ComfyUI files: the format, import of OFT
  and BOFT (``oft_blocks``); :mod:`diffadapt.formats.lycoris_export` -- export of every method
  (``oft_blocks``, LoRA, ``.diff``).
* :mod:`diffadapt.formats.names` -- community module names <-> diffusers module paths.
"""
