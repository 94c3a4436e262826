-- molal's own database next to Label Studio's (POSTGRES_DB); runs once, on an empty volume
CREATE DATABASE molal;
