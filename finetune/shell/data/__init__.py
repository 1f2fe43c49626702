"""Data: dataset files, what `ft train validate` reads and reports, rows shown token by token."""
