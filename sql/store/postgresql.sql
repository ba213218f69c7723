-- provisioner user store schema for postgresql.
-- Generated from provisioner/store/schema.py by `provisioner db ddl`; do not edit.

CREATE TABLE changes (
	id BIGSERIAL NOT NULL, 
	entity VARCHAR(16) NOT NULL, 
	entity_id INTEGER NOT NULL, 
	op VARCHAR(1) NOT NULL, 
	changed_at TIMESTAMP WITHOUT TIME ZONE DEFAULT CURRENT_TIMESTAMP NOT NULL, 
	CONSTRAINT pk_changes PRIMARY KEY (id)
);

CREATE TABLE daemon_state (
	key VARCHAR(64) NOT NULL, 
	value VARCHAR(255) NOT NULL, 
	CONSTRAINT pk_daemon_state PRIMARY KEY (key)
);

CREATE TABLE profiles (
	id SERIAL NOT NULL, 
	name VARCHAR(64) NOT NULL, 
	description VARCHAR(1024) NOT NULL, 
	created_at TIMESTAMP WITHOUT TIME ZONE NOT NULL, 
	updated_at TIMESTAMP WITHOUT TIME ZONE NOT NULL, 
	CONSTRAINT pk_profiles PRIMARY KEY (id), 
	CONSTRAINT uq_profiles_name UNIQUE (name)
);

CREATE TABLE users (
	id SERIAL NOT NULL, 
	role VARCHAR(8) NOT NULL, 
	profile_id INTEGER, 
	username VARCHAR(64) NOT NULL, 
	username_key VARCHAR(64) NOT NULL, 
	full_name VARCHAR(128) NOT NULL, 
	email VARCHAR(254) NOT NULL, 
	description VARCHAR(1024) NOT NULL, 
	password_hash VARCHAR(255), 
	last_password_reset_at TIMESTAMP WITHOUT TIME ZONE, 
	extension VARCHAR(20) NOT NULL, 
	sip_realm VARCHAR(64) NOT NULL, 
	sip_md5 VARCHAR(32) NOT NULL, 
	sip_sha256 VARCHAR(64) NOT NULL, 
	transport VARCHAR(8) NOT NULL, 
	nat VARCHAR(16) NOT NULL, 
	codecs VARCHAR(64) NOT NULL, 
	context VARCHAR(79) NOT NULL, 
	call_group VARCHAR(255) NOT NULL, 
	pickup_group VARCHAR(255) NOT NULL, 
	video VARCHAR(8) NOT NULL, 
	disabled BOOLEAN NOT NULL, 
	failed_logins INTEGER NOT NULL, 
	locked_at TIMESTAMP WITHOUT TIME ZONE, 
	failed_login_at TIMESTAMP WITHOUT TIME ZONE, 
	deleted_at TIMESTAMP WITHOUT TIME ZONE, 
	log_level VARCHAR(8), 
	messenger_sound BOOLEAN NOT NULL, 
	toast_position VARCHAR(16) NOT NULL, 
	avatar BYTEA, 
	avatar_type VARCHAR(32), 
	apikey_hash VARCHAR(64), 
	apikey_created_at TIMESTAMP WITHOUT TIME ZONE, 
	created_at TIMESTAMP WITHOUT TIME ZONE NOT NULL, 
	updated_at TIMESTAMP WITHOUT TIME ZONE NOT NULL, 
	CONSTRAINT pk_users PRIMARY KEY (id), 
	CONSTRAINT ck_users_role CHECK (role IN ('admin', 'user')), 
	CONSTRAINT ck_users_transport CHECK (transport IN ('udp', 'tcp', 'tls', 'ws', 'wss')), 
	CONSTRAINT ck_users_nat CHECK (nat IN ('yes', 'no', 'force_rport', 'comedia', 'never', 'route')), 
	CONSTRAINT ck_users_video CHECK (video IN ('yes', 'no', 'always')), 
	CONSTRAINT ck_users_log_level CHECK (log_level IS NULL OR log_level IN ('error', 'warning', 'info', 'debug')), 
	CONSTRAINT ck_users_toast_position CHECK (toast_position IN ('top-right', 'top-left', 'top-center', 'bottom-right', 'bottom-left', 'bottom-center')), 
	CONSTRAINT ck_users_user_has_profile CHECK (role = 'admin' OR profile_id IS NOT NULL), 
	CONSTRAINT fk_users_profile_id_profiles FOREIGN KEY(profile_id) REFERENCES profiles (id) ON DELETE RESTRICT, 
	CONSTRAINT uq_users_username_key UNIQUE (username_key), 
	CONSTRAINT uq_users_extension UNIQUE (extension), 
	CONSTRAINT uq_users_apikey_hash UNIQUE (apikey_hash)
);

CREATE TABLE registration_summary (
	user_id INTEGER NOT NULL, 
	server VARCHAR(64) NOT NULL, 
	state VARCHAR(16) NOT NULL, 
	device_state VARCHAR(32) NOT NULL, 
	problem VARCHAR(255) NOT NULL, 
	changed_at TIMESTAMP WITHOUT TIME ZONE NOT NULL, 
	contacts TEXT, 
	CONSTRAINT pk_registration_summary PRIMARY KEY (user_id, server), 
	CONSTRAINT fk_registration_summary_user_id_users FOREIGN KEY(user_id) REFERENCES users (id) ON DELETE CASCADE
)
 WITH (fillfactor = 50);

CREATE TABLE user_attributes (
	user_id INTEGER NOT NULL, 
	key VARCHAR(64) NOT NULL, 
	value VARCHAR(255) NOT NULL, 
	CONSTRAINT pk_user_attributes PRIMARY KEY (user_id, key), 
	CONSTRAINT fk_user_attributes_user_id_users FOREIGN KEY(user_id) REFERENCES users (id) ON DELETE CASCADE
);

-- The change feed: every change to a user reaches the daemon.

CREATE OR REPLACE FUNCTION provisioner_note_change() RETURNS trigger
LANGUAGE plpgsql AS $$
DECLARE
    eid integer;
    old_eid integer;
    opc char(1);
BEGIN
    opc := CASE TG_OP WHEN 'INSERT' THEN 'I' WHEN 'UPDATE' THEN 'U' ELSE 'D' END;
    -- The id column's name is a trigger argument: 'id' or 'user_id'.
    IF TG_OP <> 'INSERT' THEN
        IF TG_ARGV[1] = 'user_id' THEN
            old_eid := OLD.user_id;
        ELSE
            old_eid := OLD.id;
        END IF;
    END IF;
    IF TG_OP = 'DELETE' THEN
        eid := old_eid;
    ELSIF TG_ARGV[1] = 'user_id' THEN
        eid := NEW.user_id;
    ELSE
        eid := NEW.id;
    END IF;
    IF TG_OP = 'UPDATE' AND old_eid <> eid THEN
        -- A changed key: what the old id held must be re-rendered too.
        INSERT INTO changes (entity, entity_id, op) VALUES (TG_ARGV[0], old_eid, opc);
        PERFORM pg_notify('provisioner_changes', TG_ARGV[0] || ':' || old_eid);
    END IF;
    INSERT INTO changes (entity, entity_id, op) VALUES (TG_ARGV[0], eid, opc);
    PERFORM pg_notify('provisioner_changes', TG_ARGV[0] || ':' || eid);
    RETURN NULL;
END
$$;

CREATE TRIGGER trg_users_change AFTER INSERT OR UPDATE OR DELETE ON users FOR EACH ROW EXECUTE FUNCTION provisioner_note_change('user', 'id');

CREATE TRIGGER trg_user_attributes_change AFTER INSERT OR UPDATE OR DELETE ON user_attributes FOR EACH ROW EXECUTE FUNCTION provisioner_note_change('user', 'user_id');

CREATE TRIGGER trg_profiles_change AFTER INSERT OR UPDATE OR DELETE ON profiles FOR EACH ROW EXECUTE FUNCTION provisioner_note_change('profile', 'id');

CREATE OR REPLACE FUNCTION provisioner_note_truncate() RETURNS trigger
LANGUAGE plpgsql SECURITY DEFINER SET search_path FROM CURRENT AS $$
BEGIN
    INSERT INTO changes (entity, entity_id, op) VALUES ('all', 0, 'D');
    PERFORM pg_notify('provisioner_changes', 'all:0');
    RETURN NULL;
END
$$;

CREATE TRIGGER trg_users_truncate AFTER TRUNCATE ON users FOR EACH STATEMENT EXECUTE FUNCTION provisioner_note_truncate();

CREATE TRIGGER trg_user_attributes_truncate AFTER TRUNCATE ON user_attributes FOR EACH STATEMENT EXECUTE FUNCTION provisioner_note_truncate();

CREATE TRIGGER trg_profiles_truncate AFTER TRUNCATE ON profiles FOR EACH STATEMENT EXECUTE FUNCTION provisioner_note_truncate();

ALTER FUNCTION provisioner_note_change() SECURITY DEFINER SET search_path FROM CURRENT;

ALTER TABLE users ENABLE ALWAYS TRIGGER trg_users_change;

ALTER TABLE users ENABLE ALWAYS TRIGGER trg_users_truncate;

ALTER TABLE user_attributes ENABLE ALWAYS TRIGGER trg_user_attributes_change;

ALTER TABLE user_attributes ENABLE ALWAYS TRIGGER trg_user_attributes_truncate;

ALTER TABLE profiles ENABLE ALWAYS TRIGGER trg_profiles_change;

ALTER TABLE profiles ENABLE ALWAYS TRIGGER trg_profiles_truncate;

CREATE TABLE alembic_version (
	version_num VARCHAR(32) NOT NULL, 
	PRIMARY KEY (version_num)
);

INSERT INTO alembic_version (version_num) VALUES ('0014');
