"""Hostile input and faults (issue 13): each finding of the attack report as a regression test."""
