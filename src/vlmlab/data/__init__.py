"""Caption datasets: readers for the official formats and the synthetic world."""
