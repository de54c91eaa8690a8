"""The composition root and the command line: above gateway and web, so no arrow runs back up."""
