"""Where captures are kept: in memory, in one ``.npz`` file, in a stream folder, per rank.

* ``memory``: the in-memory cache and how each value is stored (``Storage``);
* ``npz``: one cache in one ``.npz`` file, without pickle;
* ``stream``: a folder written capture by capture, read back lazily;
* ``ranks``: one file per process under ``torch.distributed`` and their manifest.
"""
