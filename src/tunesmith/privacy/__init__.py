"""Privacy: differentially private training, and measuring what a tuned model memorised."""
