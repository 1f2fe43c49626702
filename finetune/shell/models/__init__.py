"""`ft models`: what models this machine has and what one of them is (`inventory`)."""
