//! The relay MTA (data plane): SMTP in, durable spool, DKIM signing, shaped delivery.
