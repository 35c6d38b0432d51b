"""Reports built from a run store: the HTML page, PNG charts and the terminal summary."""
