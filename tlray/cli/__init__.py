"""Every command-line parser: `tlray ...` and the job scripts' shared flags."""
