"""Credentials the test parents accept; shared by fixtures and tests."""

TEST_USER = "alice"
TEST_DOMAIN = "CORP"
TEST_PASSWORD = "Secret-Pass-1"
TEST_PRINCIPAL = f"{TEST_DOMAIN}\\{TEST_USER}"  # as the parent reports it: "CORP\alice"
WRONG_PASSWORD = "Wrong-Pass-9"
