"""TIR schedule rules of mulayer (imported as ``mulayer.schedules``)."""
