"""Released weights and checkpoints: the table of released files, the downloader, Orbax
checkpoints and `load`/`save`."""
