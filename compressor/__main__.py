from compressor.cli import entry

entry()
