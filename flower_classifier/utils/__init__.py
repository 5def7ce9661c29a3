"""What every layer shares: errors a user can fix, console lines, atomic files, torchrun."""
