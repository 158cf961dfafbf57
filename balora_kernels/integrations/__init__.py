"""Where users train: PEFT models, the Hugging Face Trainer, DDP / FSDP2, checkpoints.

Each submodule imports its framework only when used (peft and transformers are the ``hf`` extra):

* :mod:`.peft` -- :func:`~.peft.to_balora`: PEFT LoRA layers on the package's op + a projector;
* :mod:`.transformers` -- :class:`~.transformers.BaLoRACallback` for ``transformers.Trainer``;
* :mod:`.distributed` -- DDP notes, FSDP2 sharded projection, :func:`~.distributed.fully_shard_lora`;
* :mod:`.checkpoint` -- safetensors save / load of adapters, optimizer and projector state.
"""
