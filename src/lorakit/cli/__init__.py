"""lorakit's command line: thin wrappers that parse arguments, call the library and print."""
