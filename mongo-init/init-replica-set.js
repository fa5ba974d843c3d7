// Initiate the 3-member replica set "rs0" used by docker-compose.yml.
// For the official mongo images, which ship mongosh:
//   docker compose exec mongo1 mongosh --quiet /mongo-init/init-replica-set.js
// (mount this directory at /mongo-init), or from the host:
//   mongosh "mongodb://127.0.0.1:27017/?directConnection=true" mongo-init/init-replica-set.js
// Idempotent: if the set is already initiated it only reports its state.
// Override members with e.g. MEMBERS="127.0.0.1:27031,127.0.0.1:27032,127.0.0.1:27033".
const setName = (typeof process !== "undefined" && process.env.SET_NAME) || "rs0";
const members = ((typeof process !== "undefined" && process.env.MEMBERS) ||
  "mongo1:27017,mongo2:27017,mongo3:27017").split(",");

let initiated = false;
try {
  rs.status();
  initiated = true;
  print(`replica set ${setName} already initiated`);
} catch (e) {
  // NotYetInitialized (code 94) is expected on first run; anything else is real.
  if (e.code !== 94 && e.codeName !== "NotYetInitialized") {
    throw e;
  }
}

if (!initiated) {
  const config = {
    _id: setName,
    members: members.map((host, i) => ({
      _id: i,
      host: host,
      // The first member is preferred as primary so failover drills are
      // predictable; any member can still take over.
      priority: i === 0 ? 2 : 1,
    })),
  };
  printjson(rs.initiate(config));
}

// Wait (bounded) for a primary, so callers can start clients right after.
const deadline = Date.now() + 60 * 1000;
for (;;) {
  const primary = rs.status().members.find((m) => m.stateStr === "PRIMARY");
  if (primary) {
    print(`PRIMARY: ${primary.name}`);
    break;
  }
  if (Date.now() > deadline) {
    throw new Error("no PRIMARY elected within 60s");
  }
  sleep(500);
}
