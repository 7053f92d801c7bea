"""What a sweep is once its members have run: the report that compares them (`report`)."""
