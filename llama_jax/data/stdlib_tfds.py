"""The built-in corpus as a TFDS dataset, `llama_jax_stdlib`, so a mixture can be shown and tested
offline through the same TFDS path as c4 or wikipedia. Two configs: `code` (stdlib .py sources)
and `prose` (pydoc topics and docstrings). Prepare once, offline:

  python -c "from llama_jax.data import stdlib_tfds; stdlib_tfds.prepare('/data/tfds')"
(TFDS cannot build a class defined in __main__, hence no `python -m` here), then use
dict(name="code", tfds="llama_jax_stdlib/code", data_dir=...) in data.sources.
"""

import pathlib

import tensorflow_datasets as tfds

from llama_jax.data import corpus


class LlamaJaxStdlib(tfds.core.GeneratorBasedBuilder):
    """Python's standard library as code and prose; text in the "text" feature."""

    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "Code and prose configs; train/validation split by path hash."}
    BUILDER_CONFIGS = [
        tfds.core.BuilderConfig(name="code", description="stdlib .py sources, one per file"),
        tfds.core.BuilderConfig(name="prose", description="pydoc topics; docstrings per module"),
    ]

    def _info(self):
        return self.dataset_info_from_configs(
            features=tfds.features.FeaturesDict({"text": tfds.features.Text(),
                                                 "key": tfds.features.Text()}),
            description="The running interpreter's standard library: always present offline.")

    def _split_generators(self, dl_manager):
        del dl_manager  # nothing is downloaded
        return {split: self._generate_examples(split) for split in ("train", "validation")}

    def _generate_examples(self, split):
        if self.builder_config.name == "code":
            root = corpus.stdlib_root()
            for path in corpus.stdlib_files(split):
                key = pathlib.Path(path).relative_to(root).as_posix()
                yield key, {"text": corpus.read_text(path), "key": key}
        else:
            for key, text in corpus.prose_documents(split):
                yield key, {"text": text, "key": key}


def prepare(data_dir, configs=("code", "prose")):
    """Builds the configs under data_dir (a no-op for those already there)."""
    for name in configs:
        tfds.builder(f"llama_jax_stdlib/{name}", data_dir=data_dir).download_and_prepare()
