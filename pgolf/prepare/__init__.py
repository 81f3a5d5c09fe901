"""The prepare stage (corpus -> tokenizer + token shards): the stage itself (prepare), reading
text corpora (corpus), SentencePiece tokenizers and their byte tables (tokenizer), and the download
of the challenge's FineWeb export (fineweb, `pgolf fineweb`). Imports only pgolf.shared
and pgolf.config."""
