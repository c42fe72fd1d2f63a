"""Moving registered resources out of an archive: export (tar, zip, folder), copy into
another archive, fetch to a folder. Each reads the source once, hashes it in the same
pass, and keeps a copy only when it matches the registered SHA-1."""
