"""Transfer vs scratch: the malaria original's experiment on any prepared dataset."""
