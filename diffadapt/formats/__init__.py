"""Adapter file formats, each beside the others and read into one in-memory record:

* :mod:`diffadapt.formats.pipeline_file` -- diffadapt's pipeline artifact (one ``.safetensors``
  file, or a folder of PEFT folders and a manifest) and the reader that takes every format;
* :mod:`diffadapt.formats.peft` -- what PEFT's files say for each method (one declaration per
  method); the PEFT folder layout itself is :mod:`diffadapt.checkpoint`;
* :mod:`diffadapt.formats.lycoris` -- LyCORIS / kohya / ComfyUI files: the format, import of OFT
  and BOFT (``oft_blocks``); :mod:`diffadapt.formats.lycoris_export` -- export of every method
  (``oft_blocks``, LoRA, ``.diff``);
* :mod:`diffadapt.formats.names` -- community module names <-> diffusers module paths.
"""
